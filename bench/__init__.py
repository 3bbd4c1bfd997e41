"""`make bench`: HTTP throughput and latency of the service against what bounds it.

See bench/__main__.py for what is measured and how.
"""
