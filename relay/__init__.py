"""The data plane: SMTP submission, policy, DKIM, spool and delivery."""
