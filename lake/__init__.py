"""The lake's machinery: what the driver of etl.py needs around the job itself.

One module per concern: errors, paths, aws (boto3 clients), tables (the table spec), plan (how a run reads
and writes, and Spark's set-up), stores (local disk and S3), publish (staging, journal, recovery), lock
(one writer at a time), catalog (Glue) and report (the run report).

Only the driver imports this package: code that runs inside Spark tasks lives in etl.py, so an executor
never needs it. spark-submit ships it as dist/lake.zip (`make dist`) with --py-files.
"""
