"""The local store: snitch.db and conn.log.

schema creates and migrates snitch.db, sqlite writes Connections into it and opens it read-only
for the readers, queries is the SQL behind view's tabs and the dashboard's charts, conn_log
writes conn.log. worker is the writer process.
"""
