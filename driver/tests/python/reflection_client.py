#!/usr/bin/env python3
"""A gRPC client that knows nothing of vmblk but its socket: default channel options,
every message type learned from the server's reflection service.

    reflection_client.py SOCKET POOL

Prints one JSON object of what it saw: the services listed, the health status, a
volume created, listed and deleted, and the status codes of a bad name and of a
missing volume. Exits non-zero only if the client itself cannot run.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "vmblk.v1.StorageDriver"
HEALTH = "grpc.health.v1.Health"


def main():
    socket_path, pool = sys.argv[1], sys.argv[2]
    # Default options: grpc-core sends the socket's path as :authority.
    channel = grpc.insecure_channel("unix:" + socket_path)
    db = ProtoReflectionDescriptorDatabase(channel)
    pool_ = descriptor_pool.DescriptorPool(db)
    out = {"services": sorted(db.get_services())}

    def call(service, method, fields):
        desc = pool_.FindServiceByName(service).FindMethodByName(method)
        req_cls = message_factory.GetMessageClass(desc.input_type)
        resp_cls = message_factory.GetMessageClass(desc.output_type)
        stub = channel.unary_unary(
            "/%s/%s" % (service, method),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        try:
            resp = stub(json_format.ParseDict(fields, req_cls()), timeout=60)
            return {"ok": json_format.MessageToDict(resp)}
        except grpc.RpcError as e:
            return {"code": e.code().name, "message": e.details()}

    out["health"] = call(HEALTH, "Check", {"service": ""})
    out["create"] = call(
        SERVICE, "CreateVolume", {"pool": pool, "name": "py-vol", "sizeBytes": str(1 << 20)}
    )
    out["list"] = call(SERVICE, "ListVolumes", {"pool": pool})
    out["delete"] = call(SERVICE, "DeleteVolume", {"pool": pool, "name": "py-vol"})
    out["bad_name"] = call(
        SERVICE, "CreateVolume", {"pool": pool, "name": "../etc", "sizeBytes": "4096"}
    )
    out["missing"] = call(SERVICE, "GetVolume", {"pool": pool, "name": "no-such-volume"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
