"""The models: the pipeline and its attention, resampler, LoRAs, extra controls, loading from the hub, memory
profiles, and the tiny checkpoints the tests and the tiny preset run on."""
