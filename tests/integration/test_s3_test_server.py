"""The SeaweedFS test server itself: it must hold every bucket the suite makes, on any disk.

Each bucket is a SeaweedFS collection with volumes of its own; ``weed mini`` by default allows
free disk / 1 GiB volumes, so on a CI machine with ~30 GiB free the suite's late tests failed to
write (InternalError). Twice the buckets the suite makes must take writes, whatever the disk.
"""

from __future__ import annotations

from tests.services.seaweedfs import SeaweedS3

# The suite makes about 60 buckets (one per S3 test); twice that, with room.
BUCKETS = 120


def test_the_test_server_takes_writes_in_more_buckets_than_the_suite_makes() -> None:
    with SeaweedS3() as server:
        client = server.client()
        for number in range(BUCKETS):
            bucket = f"many-{number}"
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="one.txt", Body=b"x")
        assert client.get_object(Bucket=f"many-{BUCKETS - 1}", Key="one.txt")["Body"].read() == b"x"
