"""The benchmark of CollabDM's client pass (and of the rest of a run), as a library.

``experiments/bench.py`` is its command line; the probes
(``sampling_probe.py``, ``reference_bench.py``) use its pieces:

* ``cases``: sizes (``FULL``, ``QUICK``, ``ACCEL``), case names and their
  selection, the benchmark's workloads;
* ``measure``: timings, matmul peaks, copy bandwidth, XLA FLOP counts,
  compile events, the machine's description;
* ``client_pass``: the client pass, timed and extrapolated;
* ``runs``: the server step and an end-to-end run of a config;
* ``gpu``: the GPU cases (three precisions, references, accuracy effects);
* ``driver``: the whole run into one JSON document (``run(Options)``).

How the client pass is measured. Client data is random (throughput does not
depend on pixel values) with the datasets' shapes and training-set sizes,
split evenly over K clients with uniform labels; the statistics are those of
the default config (ConvNet-3, batch_real 32, embed_batch 64, DM's DSA).
One *chunk* is one call of ``client.block_stats_fn`` (the jitted function
``iter_client_stats`` calls) on one block of clients already on the devices,
for one iteration (``t_chunk`` on a GPU), followed by the device-to-host
copy ``iter_client_stats`` does. The host-to-device copy of a block is timed
on its own and charged as ``iter_client_stats`` makes it: once per pass when
the pass has one block, else once per block and call of the default
config's ``stats.t_chunk`` (8) iterations. Blocks use
``iter_client_stats``' default clients per device unless a call would then
embed more than ``max_chunk_images`` padded samples (the layout used is
recorded per case). After a
warm-up call (tracing and compilation), a few chunks are timed and the whole
pass (every block, every iteration) is extrapolated linearly from them: the
cases are labelled ``"method": "extrapolated"`` with the measured share.
Iterations are independent and sequential inside the block function, so a
pass costs T times one iteration of every block; per-chunk times are
reported so that a step above the trend can be read off, and the script
checks that no timed chunk triggered a new trace or compilation.

The practical peak is the best of several jitted float32 2048 x 2048
matmuls, timed at the start and again at the end of the run (the better of
the two is used, so a busy moment does not flatter the ratios). As a second
reference, the bare embedding (one jitted ConvNet forward of a batch) is
timed too: the client pass cannot beat it without a faster network.

FLOPs are XLA's own count (``cost_analysis`` of the compiled
``client.class_moments`` on one embed batch: DSA, ConvNet embedding and
per-class sums, divided by the batch size), times the number of *real*
samples embedded: padding the implementation embeds counts as wasted time,
not as work. XLA counts the multiply-adds of convolution taps that fall
inside the (unpadded) input only, so its count is a little below 2 x MACs of
the padded convolution.
"""
