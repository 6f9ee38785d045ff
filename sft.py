"""sft.py: not implemented yet (see the open issue for it). This file is a placeholder and trains nothing."""

raise SystemExit("sft.py is not implemented yet")
