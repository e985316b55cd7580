#!/bin/sh
# The image's entry point. With no command (or "serve") it runs the service
# that SERVICE names under gunicorn, configured by shared.gunicorn_conf from
# PORT and GUNICORN_*; any other command runs as given, so the same image
# serves, migrates (`payoutctl migrate`, a Cloud Run job) and answers
# operators' commands.
set -eu

if [ "$#" -gt 0 ] && [ "$1" != "serve" ]; then
    exec "$@"
fi

case "${SERVICE:-}" in
    gcaccumulator | gcbatchprocessor | gcmicrobatchprocessor) ;;
    *)
        # One JSON line, like every other log line, so an alert can match it.
        printf '{"severity": "ERROR", "message": "unknown_service", %s}\n' \
            '"expected": "gcaccumulator|gcbatchprocessor|gcmicrobatchprocessor"' >&2
        exit 64
        ;;
esac

exec gunicorn --config python:shared.gunicorn_conf "${SERVICE}.app:create_app()"
