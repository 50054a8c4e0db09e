"""The Protocol's procedures as Prefect flows, and the human checkpoint they share."""
