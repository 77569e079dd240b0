"""What the user is told: record.json, exe.log and error.log, desktop notifications, VirusTotal.

Three processes, each a `*_worker` module next to the pure code it runs: the record keeper
(record_keeper: what is new about an executable), the notifier (notification_text, for the
desktop sessions that desktop_sessions finds) and the VirusTotal checker (virustotal's client).
"""
