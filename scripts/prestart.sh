#!/bin/sh
# One-shot step before the API, workers and scheduler start (the compose `migrate` service):
# wait until the database accepts connections, then migrate it to head. Exits non-zero, with the
# last error, if the database does not answer within DB_WAIT_S seconds (default 60).
set -eu
python - <<'PY'
import os
import sys
import time

from sqlalchemy import text

from lmqueue.db import make_engine
from lmqueue.settings import get_settings

url = get_settings().resolved_database_url()
deadline = time.monotonic() + float(os.environ.get("DB_WAIT_S", "60"))
engine = make_engine(url)
while True:
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        break
    except Exception as exc:
        if time.monotonic() > deadline:
            sys.exit(f"prestart: the database did not answer in time: {exc}")
        print("prestart: waiting for the database ...", flush=True)
        time.sleep(1)
engine.dispose()
PY
exec python -m cli migrate
