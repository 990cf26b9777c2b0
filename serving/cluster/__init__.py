"""SILO on a Ray cluster (`silo serve --ray`): replicas behind one endpoint, one writer for the store.

    config.py      the `cluster:` section (replicas or autoscaling, rollout and health settings)
    controller.py  StoreController, a named Ray actor: the only writer of the store (removals, swaps,
                   reloads, the contribution ledger); it rolls every new generation out to every replica
                   before the change counts as applied
    replica.py     SiloReplica, the Ray Serve deployment: one engine and model copy per replica over the
                   shared (memory-mapped) store; silo.v1 behind Ray Serve's gRPC proxy, the HTTP door behind
                   its HTTP proxy
    deploy.py      start it all on a cluster (`serve_on_ray`) and stop it
"""
