"""Create S3 buckets if they are missing; idempotent, so the init job can run on every `up`.

Works against any S3 endpoint: boto3 reads AWS_ENDPOINT_URL (empty for real AWS) and the AWS
credential variables. Usage: python create_buckets.py BUCKET [BUCKET ...]
"""

import sys

import boto3
from botocore.exceptions import ClientError

_MISSING = {"404", "NoSuchBucket", "NotFound"}


def ensure_bucket(s3, name: str, region: str) -> None:
    try:
        s3.head_bucket(Bucket=name)
        print(f"bucket {name}: exists")
        return
    except ClientError as err:
        if err.response["Error"]["Code"] not in _MISSING:
            raise
    kwargs = {}
    # us-east-1 is the one region that rejects an explicit LocationConstraint.
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(Bucket=name, **kwargs)
    except ClientError as err:
        # Another creator won the race: the bucket exists and is ours, which is all we wanted.
        if err.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise
    print(f"bucket {name}: created")


def main(names: list[str]) -> int:
    if not names:
        print("usage: create_buckets.py BUCKET [BUCKET ...]", file=sys.stderr)
        return 2
    session = boto3.session.Session()
    s3 = session.client("s3")
    for name in names:
        ensure_bucket(s3, name, session.region_name or "us-east-1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
