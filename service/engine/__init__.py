"""The engine: where inference requests are admitted, queued, run on the device and answered.

Glossary, one word per concept, used in code, metrics and docs. A **job** is one request's work
in the engine (`GenerateJob` for /generate at the model's grid, `BatchJob` for /encode, /decode
and wider grids); it asks for n **images**, and carries the **payload** its handler checked
(`GeneratePayload`: settings, seed, grid; a batch job's input array). A **picture** is an
image's decoded pixels (uint8), as opposed to the `Image` that stands for it here; a job's
**company** is how many images sampled beside it at its first step (the access log's
batch_size). **Admission** is the one gate in front of every **queue** (where images wait to
start): it counts them across all queues against TAMING_MAX_QUEUE, refuses while draining and
arms each job's deadline. Generation runs in **lanes**: threads, each with its own **rows**
(lines of a KV cache and sampling state; an image holds one row, two when guided; a **slot**,
as in TAMING_GENERATE_SLOTS and `taming_slots_active`, is room for one guided image). A
**canvas** is an image on a grid beyond the model's (relative-position models): a lane holds at
most one beside its rows and steps a **wavefront** of its cells with them. On the device, a
lane's rows are a `RowCache` and a canvas's keys a `CanvasCache` (models/gpt.py): the KV caches
of the model's one forward. The previews of streamed rows are built from **patches** (each
code's decoded patch, made the first time a preview shows the code, then kept). A lane's
**scheduler** seats images in rows, compacts them and frees them (bookkeeping only); its
**runner** owns the device side, and one **step** gives every occupied row its next token.
Everything else runs as **batches** that the **collector** forms from its queues and its
runners run to completion; requests received but not yet queued are **arrivals** (a filling
batch waits for them).

Reading order: the way in is service/app.py's `INFERENCE_ROUTES` (a route's handler) and
service/inference.py (the steps every route shares: admit, sample_images, encode_uploads);
then `jobs` (the request objects), `admission` (the gate), `scheduler` (rows),
`step_runner` and `canvas_runner` (the device; `previews` for streamed rows), `lanes` (the
loop: schedule, run, postprocess; threads and the bridge to the event loop), `batches` (the
collector) with `batch_runners`; `oom` (the out-of-memory split both use).
"""

from .admission import Admission
from .batch_runners import runners_for
from .batches import Arrivals, BatchJob, BatchPolicy, Collector
from .jobs import GenerateJob, GeneratePayload, Image
from .lanes import GenerationEngine, lane_count
from .scheduler import Scheduler
from .step_runner import StepRunner

__all__ = ["Admission", "Arrivals", "BatchJob", "BatchPolicy", "Collector", "GenerateJob",
           "GeneratePayload", "GenerationEngine", "Image", "Scheduler", "StepRunner",
           "lane_count", "runners_for"]
