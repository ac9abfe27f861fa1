"""Webhooks: Standard Webhooks signing, the SSRF guard for callback URLs, job links."""
