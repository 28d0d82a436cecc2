"""Generator backends behind one protocol (see base.py); registry.py says what each can do."""
