"""The lake's machinery beside etl.py (issue 16). A placeholder until it moves here from etl.py."""
