"""Bundle stores: one interface (`store.BundleStore`), the filesystem and S3 behind it."""
