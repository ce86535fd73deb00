"""One small pure reducer per event type, grouped by domain.

A reducer has the signature ``(state, indexed_event, event) -> state``. Reducers are total:
an event that makes no sense against the state (finishing an unknown window, work for an
unknown devshard) leaves the domain unchanged instead of raising, because the log is the
truth and replay must never stop half-way. The master validates requests *before* it
indexes them, so such events only appear in hand-made or foreign logs.
"""
