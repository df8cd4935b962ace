# Filters `pip install -q` output into a log (scripts/setup.sh): the warning a pip config repeats for each
# package (an index folder that is not there) is counted into one line, and setuptools' 10-line "Editable
# installation" notice for `pip install -e` (a reminder, not a problem) becomes one line. Everything else passes.
/is ignored: it is neither a file nor a directory/ { n++; next }
/BuildBackendWarning: Editable installation\./ { skip = 12; editable = 1; next }
skip > 0 { skip--; if ($0 ~ /with strategy, WheelFile/) skip = 0; next }
{ print; fflush() }
END {
    if (n) printf "[setup] pip: %d warnings about configured index folders that do not exist here\n", n
    if (editable) print "[setup] pip: setuptools notes that the install is editable (imports read this checkout)"
}
