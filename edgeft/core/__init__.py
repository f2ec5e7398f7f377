"""The foundation every other layer stands on: nothing heavy is imported here.

- ``errors``: the exceptions the CLI turns into one-line messages;
- ``fsutil``: atomic files and directories, free-space checks;
- ``records``: verification records and their binding to file hashes;
- ``progress``: progress bars and plain progress lines;
- ``rows``: reading and checking data files (JSONL, JSON, CSV/TSV);
- ``answers``: answer normalisation for exact-match scores;
- ``compare``: agreement of next-token distributions (top-1, KL) and perplexity (numpy).
"""
