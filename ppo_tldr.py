"""ppo_tldr.py: not implemented yet (see the open issue for it). This file is a placeholder and trains nothing."""

raise SystemExit("ppo_tldr.py is not implemented yet")
