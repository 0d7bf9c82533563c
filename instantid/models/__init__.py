"""The models: the pipeline and its attention, resampler, prompt encoding, LoRAs and extra controls; loading
from the hub, memory profiles and the memory report; the tiny checkpoints the tests and the tiny preset run on."""
