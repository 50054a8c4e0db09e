"""The control plane's services: the actions that flows, the CLI and Slack answers all call."""
