"""The Protocol as data: typed runbook files and the templates they render."""
