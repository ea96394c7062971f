"""Webhooks: operators register URLs for fleet event types; deliveries are signed and retried."""
