-- The pipeline's PostgreSQL role: it owns Dagster's database (runs, events, the export record)
-- and nothing else: no superuser, no CREATEDB, no CREATEROLE, no other database's objects.
-- An administrator runs it with psql, at every start of docker-compose's postgres-init:
--   psql -v role=export_pipeline -v password=... -v db=export_pipeline -f deploy/postgres-init.sql
-- Run again, it creates nothing twice; it sets the password, the role's attributes and the
-- database's owner again, so a changed CHECKPOINT_DB_PASSWORD takes effect at the next start.
\set ON_ERROR_STOP on

-- Refuse to take the rights of the administrator running this (CHECKPOINT_DB_USER=postgres).
SELECT :'role' = current_user AS is_administrator \gset
\if :is_administrator
  \warn CHECKPOINT_DB_USER= :role 'is the administrator running this script: the pipeline needs a role of its own'
  SELECT 1 / 0 AS the_pipelines_role_must_not_be_the_administrator;
\endif

SELECT format('CREATE ROLE %I LOGIN', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'password';

SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
ALTER DATABASE :"db" OWNER TO :"role";
-- Nobody else connects to it (PUBLIC may connect to a new database by default).
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
-- PostgreSQL 15 and later give the public schema to the database's owner; before 15 it belongs
-- to the administrator, and Dagster could not create its tables.
\connect :"db"
ALTER SCHEMA public OWNER TO :"role";
