"""dpo.py: not implemented yet (see the open issue for it). This file is a placeholder and trains nothing."""

raise SystemExit("dpo.py is not implemented yet")
