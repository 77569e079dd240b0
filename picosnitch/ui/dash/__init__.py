"""`picosnitch dash`: the web dashboard (app: the server and its security; api: the JSON
endpoints; static/: the page)."""
