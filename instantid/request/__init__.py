"""The request and the stages it walks: Request/Job/Result (requests), prepare (CPU: decode, faces, the mode's
scene) -> render (GPU: pipeline, refinement, out-of-memory step-down) -> finish (CPU: paste-back, identity
scores); durations (the GPU seconds asked). What a request can ask is declared in instantid/declaration.py."""
