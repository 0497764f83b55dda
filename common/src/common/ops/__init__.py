"""One-shot operational jobs: bucket setup and the sweep of what crashes left behind."""
