"""The Ray Serve wiring: every service a deployment with its own replicas,
resources and autoscaling; gRPC between them; KV blocks shared through Redis.

- ``config``: the application's arguments (pydantic): arserve's settings and
  each deployment's options.
- ``directory``: where replicas announce their gRPC addresses, and how
  callers pick one (``Peers``, ``Remote``).
- ``replica``: what every service replica does (serve gRPC, announce itself,
  report load).
- ``app``: the deployments and the application builder that
  ``serve run deploy/serve_config.yaml`` imports.
- ``proxy``: the public servicer as Ray's gRPC proxy imports it.
- ``logs``: callers' errors as INFO lines in Ray Serve's logs.
"""
