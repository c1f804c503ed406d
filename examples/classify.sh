#!/usr/bin/env bash
# Classify a real JapaneseVowels test utterance with curl; its true label is speaker-1.
#   LSTM_SERVE_URL (default http://127.0.0.1:8000), LSTM_SERVE_API_KEY (when the server has keys)
set -euo pipefail
url=${LSTM_SERVE_URL:-http://127.0.0.1:8000}
auth=()
if [[ -n "${LSTM_SERVE_API_KEY:-}" ]]; then auth=(-H "Authorization: Bearer $LSTM_SERVE_API_KEY"); fi
curl -sf "${auth[@]}" "$url/v1/classify" --json @"$(dirname "$0")/classify-request.json"
echo
