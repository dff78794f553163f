-- Runs once, when the postgres volume is first initialised. MLflow gets the database named by
-- POSTGRES_DB (mlflow); Prefect gets its own so neither's migrations touch the other's tables.
CREATE DATABASE prefect;
