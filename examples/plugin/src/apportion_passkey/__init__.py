"""apportion-passkey: an example plugin."""
