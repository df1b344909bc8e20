"""The training toolkit every loop uses: resumable state with a fingerprint, optimizer and
learning-rate schedules, batch order. Uses `fdpipe.common` only."""
