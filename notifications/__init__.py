"""Messages to people: Slack approvals and alerts, and the signed interactivity endpoint."""
