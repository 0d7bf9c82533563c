"""The request: its declaration (parameters, modes, speeds), Request/Job/Result, and the stages it walks,
prepare (CPU: scenes) -> render (GPU) -> finish (CPU); durations, prompts, styles."""
