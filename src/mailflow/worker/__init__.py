"""The long-running worker: the receive loop (`loop`), one delivery (`delivery`), the per-key
gate and parking policy (`gate`), and the health file (`health`)."""
