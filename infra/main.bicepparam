// Parameters from environment variables, so that one file serves both paths:
//   azd:  `azd env set DATAVERSE_URL https://contoso.crm4.dynamics.com` (azd passes its environment's values;
//         it sets AZURE_ENV_NAME, AZURE_LOCATION and AZURE_PRINCIPAL_ID itself)
//   az:   `export DATAVERSE_URL=...` then
//         `az deployment group create --resource-group <rg> --parameters infra/main.bicepparam`
// The three DATAVERSE_* values are required: the deployment stops with the variable's name when one is unset.
// Every other parameter keeps main.bicep's default unless set here.
using './main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'dataverse-s2s')
param location = readEnvironmentVariable('AZURE_LOCATION', '')
param principalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')
param principalType = readEnvironmentVariable('AZURE_PRINCIPAL_TYPE', 'User')

param dataverseUrl = readEnvironmentVariable('DATAVERSE_URL')
param dataverseTenantId = readEnvironmentVariable('DATAVERSE_TENANT_ID')
param dataverseClientId = readEnvironmentVariable('DATAVERSE_CLIENT_ID')

// Optional; prefer `az keyvault secret set` after the deployment (see the README, "Deploy").
param dataverseClientSecret = readEnvironmentVariable('DATAVERSE_CLIENT_SECRET', '')
param webhookSigningSecret = readEnvironmentVariable('WEBHOOK_SIGNING_SECRET', '')

// Deny (default) or Allow; and a comma-separated list of addresses let through the vault firewall.
param keyVaultNetworkDefaultAction = readEnvironmentVariable('KEY_VAULT_NETWORK_DEFAULT_ACTION', 'Deny')
param keyVaultAllowedIpAddresses = split(readEnvironmentVariable('KEY_VAULT_ALLOWED_IPS', ''), ',')

// Comma-separated addresses let through the storage firewall (tools/queuectl.py, roster uploads).
param storageAllowedIpAddresses = split(readEnvironmentVariable('STORAGE_ALLOWED_IPS', ''), ',')

// The authorization policy (docs/authorization.md): a blob path in the app's storage, or the default policy's tables.
param authorizationPolicyBlob = readEnvironmentVariable('AUTHORIZATION_POLICY_BLOB', '')
param allowedEntitySets = readEnvironmentVariable('ALLOWED_ENTITY_SETS', 'contacts,accounts,leads')
