"""What Optuna may propose (spaces.py), and the widest model that fits the byte budget (budget.py)."""
