"""eventspec's coordinator: orchestration, the `coordinator` CLI and the reports. Never imports torch."""
