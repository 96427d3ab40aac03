"""The boundary between the front ends and the engine process (FRONTENDS > 1).

Front-end processes (app.api, app.frontend) take the requests, decode and resize the images,
and write each model-ready tensor into a slot of a shared-memory pool of their own; the engine
process (app.engine_process) owns the models and the batchers, and reads its batches from those
slots. What crosses, and how:

- ``messages``: the small messages (a run of one image, its result, the models' state, model
  control), pickled; never an image tensor.
- ``channel``: one Unix-socket connection per front end, length-prefixed frames; a frame may
  carry file descriptors, which is how a pool's memory (a memfd) reaches the engine.
- ``slots``: the pools, one per model version in each front end, a slot for each image the
  front end may admit for that version. A slot is the front end's from the moment it takes it
  until the engine has answered that image's run: a request whose client left still holds its
  slot until then, and a front end that dies takes its pools with it (the engine unmaps them
  once its runs are done; the memory goes with the last mapping).
"""
