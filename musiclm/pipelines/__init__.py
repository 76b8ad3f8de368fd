"""Apache Beam jobs: prepare audio shards, tokenize a corpus."""

import logging


class _WithoutGcpNotice(logging.Filter):
    """Beam announces at import that its optional Google Cloud clients are missing; on the local runner
    that is noise (``pip install 'musiclm[gcp]'`` brings them for Dataflow, which says so itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_WithoutGcpNotice())
