"""The readers: `picosnitch view`, `top` and `dash`. They never need root.

text is the presentation all three share (safe text, sizes, time ranges), annotations the
countries and VirusTotal statuses shown next to values; terminal holds what the two curses UIs
share. view and top are the curses UIs, dash/ the web dashboard (which never imports curses).
"""
