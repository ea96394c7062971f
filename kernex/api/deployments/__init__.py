"""Deployments: bundles rolled out to devices by signed deploy commands; rollback and bundle history."""
