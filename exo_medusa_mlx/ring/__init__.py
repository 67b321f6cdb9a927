"""A gRPC ring of Medusa shard engines across processes (or machines): exo's NodeService wire format.

``node`` serves one shard (``mlx_medusa node``), ``client.RingClient`` drives a
request through running nodes, ``launcher.LocalRing`` starts local node processes,
``command`` is ``mlx_medusa ring``. ``node_service.proto`` is the schema; ``proto``
converts its messages to numpy arrays and ``inference_state`` dicts, validated.

``node_service_pb2.py`` and ``node_service_pb2_grpc.py`` are generated (grpcio-tools
1.85.1, protobuf gencode 7.35.1: they need grpcio>=1.85.1 and protobuf>=7.35.1 at
run time). Regenerate them from the repository root with:

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. exo_medusa_mlx/ring/node_service.proto

Nothing is imported here, so ``python -m exo_medusa_mlx.ring.node`` loads only what a node needs.
"""
