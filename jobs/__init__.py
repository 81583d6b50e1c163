"""The two example jobs the project grew from: file_streaming and dict_streaming.

Each runs a producer side and a consumer side as separate processes with separate broker
connections (or one side only, with ``--role``, as the docker compose workers do).
"""
