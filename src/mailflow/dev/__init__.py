"""Development and emulation: the embedded moto server, `mailflow dev`, SES receiving emulation,
the SMTP emulator and idempotent provisioning. Never on the production path."""
