"""Device configuration: fleet-wide defaults, per-device overrides, versions delivered as signed commands."""
