"""Models in worker processes: the transport, the page broker, shared weights, the worker's
step loop, the front's engine clients, router and supervisor."""
