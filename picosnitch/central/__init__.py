"""The central SQL server ("DB sql server"): PostgreSQL or MariaDB/MySQL that many machines log to.

settings checks the setting and loads the driver, writer sends batches of rows, backlog keeps
them on disk until the server has committed them, rollup keeps the hourly sums; connect and
queries are the readers' side (view --db, dash --db). worker is the unprivileged writer process.
"""
