"""What the tests share, by job (test modules import from here, never from each other):

- ``tiny``: tiny random MLX models and heads, mlx-lm's own greedy decoding (the MLX oracle).
- ``torch_models``: tiny torch models, the MLX ones in transformers, transformers' ``generate``.
- ``oracle``: ``generate_step``'s tokens as a reference; heads that know the greedy continuation.
- ``batch_oracle``: the batched step's oracle heads, a stand-in tokenizer, a batch run to its end.
- ``sampling``: exact sampling's machinery: the joint distribution of plain sampling, a chi-square test.
- ``graphs``: a stand-in for CUDA graphs on a CPU (``GraphedVerifier``'s flow without a GPU).
- ``folders``: Hugging Face folders written from tiny models.
- ``engines``: shard engines as a ring in one process; exo 0.0.x's engine test and stock node.
- ``training``, ``server``: the training and server tests' data, fixtures and clients.
- ``events``: wait for a condition, record opened files or network, a process's CPU time.
- ``processes``: commands run in-process or as processes, ring node processes, scripts.
- ``exo_harness``: exo 0.0.x as processes; ``exo1_driver``: exo 1.x's own runners, driven.
- ``distributed_worker``: one rank of ``test_distributed.py`` (a script the launcher runs).
"""
