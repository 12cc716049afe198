-- The pipeline's PostgreSQL role: it owns Dagster's database (runs, events, the export record)
-- and nothing else: no superuser, no CREATEDB, no CREATEROLE, no other database's objects.
-- An administrator runs it with psql, the pipeline's settings in the environment (docker-compose's
-- postgres-init does at every start), so no password is on a command line:
--   CHECKPOINT_DB_USER=export_pipeline CHECKPOINT_DB_NAME=export_pipeline \
--   CHECKPOINT_DB_PASSWORD=... psql -h HOST -U postgres -d postgres -f deploy/postgres-init.sql
-- Run again, it creates nothing twice; it sets the password, the role's attributes and the
-- owners again, so a changed CHECKPOINT_DB_PASSWORD takes effect at the next start.
\set ON_ERROR_STOP on
\getenv role CHECKPOINT_DB_USER
\getenv db CHECKPOINT_DB_NAME
\getenv password CHECKPOINT_DB_PASSWORD
\if :{?role}
\else
  \set role ''
\endif
\if :{?db}
\else
  \set db ''
\endif
\if :{?password}
\else
  \set password ''
\endif
SELECT :'role' = '' OR :'db' = '' OR :'password' = '' AS unset \gset
\if :unset
  \warn 'CHECKPOINT_DB_USER, CHECKPOINT_DB_NAME and CHECKPOINT_DB_PASSWORD must all be set'
  SELECT 1 / 0 AS checkpoint_db_settings_missing;
\endif

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

\connect :"db"
-- PostgreSQL 15 and later give the public schema to the database's owner; before 15 it belongs
-- to the administrator, and Dagster could not create its tables.
ALTER SCHEMA public OWNER TO :"role";
-- Tables another role created (a stack that ran the pipeline as the administrator) pass to the
-- pipeline's role, with the sequences of their columns; standalone sequences too.
SELECT format('ALTER TABLE public.%I OWNER TO %I', tablename, :'role')
FROM pg_tables WHERE schemaname = 'public' AND tableowner <> :'role' \gexec
SELECT format('ALTER SEQUENCE public.%I OWNER TO %I', c.relname, :'role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'S' AND pg_get_userbyid(c.relowner) <> :'role'
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype IN ('a', 'i')) \gexec
